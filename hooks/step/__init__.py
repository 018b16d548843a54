"""One optimizer step's measurement: cadence, the measurement itself, the step ledger, records, the host copy
and the step sites."""
