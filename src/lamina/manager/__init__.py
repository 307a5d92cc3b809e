"""The manager: database models, services and (later) the HTTP API and console."""
