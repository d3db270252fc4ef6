"""The `ctr` command: one entry point that wires model/, export/ and service/ together."""
