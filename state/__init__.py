"""What serves: tile layout and math, codecs, the RocksDB view store and the read client."""
