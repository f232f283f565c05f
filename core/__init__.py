"""The core: job operations, the one owner of every job state change."""
