"""Kernel tuning: `database` reads and applies MetaSchedule tuning logs (what every build needs),
`search` writes them (`pockengine tune`)."""
