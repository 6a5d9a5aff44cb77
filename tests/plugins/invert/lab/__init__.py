"""What never runs in the service: here only the model builder and the demo study."""
