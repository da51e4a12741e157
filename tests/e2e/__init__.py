"""End-to-end and cross-package tests: commands in subprocesses, Kafka, S3, crashes, clusters."""
