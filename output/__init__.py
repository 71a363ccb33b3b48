"""Output: the ledger of committed parts, finalize (check, merge, index, manifest), search, evaluation, status.
Imports workers, engine, dll and core only."""
