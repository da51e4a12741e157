"""Tests of connectors/: Avro, Kafka, the warehouse segments and files, the object store."""
