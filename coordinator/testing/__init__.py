"""Test and load-test tools that speak the coordinator's protocol; nothing here is part of
the service."""
