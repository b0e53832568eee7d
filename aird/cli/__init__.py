"""The command line: parses options, calls the core, renders tables (stderr) and JSONL (stdout)."""
