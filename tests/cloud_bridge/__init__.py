SMALL_MAX_PACKET = 16384  # the small_broker fixture's max_packet_size: big payloads must be chunked
