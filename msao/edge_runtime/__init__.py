"""The edge daemon (intake, MAS analysis, scheduler, executor). Never imports torch."""
