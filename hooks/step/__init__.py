"""One optimizer step: its measurement and reading, the step ledger, its record and host copy, the step sites."""
