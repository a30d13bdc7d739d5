"""Everything that runs a segment: bundles, backends, generation. Knows nothing of MQTT or scheduling; never imports torch."""
