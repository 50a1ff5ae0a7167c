"""Helpers for deployment tests: real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1."""
