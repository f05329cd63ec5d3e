//! Helpers for end-to-end tests: spawn processes, free ports, wait for conditions.
