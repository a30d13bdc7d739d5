"""MQTT 5 wire protocol, tensor codec and the cloud worker. Decides no placement."""
