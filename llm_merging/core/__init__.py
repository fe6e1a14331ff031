"""Core helpers every layer may use: errors, the wall-clock budget, atomic I/O and JSON, resources
(memory, versions, free bytes), devices and processes. Nothing here knows about models or methods."""
