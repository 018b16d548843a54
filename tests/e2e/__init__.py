"""End-to-end tests: real servers, real processes, the installed wheel."""
