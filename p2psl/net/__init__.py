"""Peers talking: authentication, WebSocket links, exactly-once sessions, routing, heartbeats."""
