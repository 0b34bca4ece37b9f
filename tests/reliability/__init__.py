"""Reliability and security tests (issue 7): concurrent writers, kills, bad input, training faults, untrusted files."""
