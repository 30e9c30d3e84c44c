"""Adapters that carry a call to the AI service (``service_type``)."""
