"""The application: feature definitions, the aggregation core, the dataflow and the commands."""
