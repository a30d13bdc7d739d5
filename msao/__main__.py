import sys

from msao.cli import main

sys.exit(main())
