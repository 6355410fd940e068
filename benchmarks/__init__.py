"""Performance harness for mics-agents (not run by the test suite): see README.md in this folder."""
