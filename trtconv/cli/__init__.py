"""The command line: one module per command group; each builds a config, calls one function, renders."""
