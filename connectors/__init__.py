"""The log's edge: Avro envelope, partitioner, warehouse segments, input files, Kafka."""
