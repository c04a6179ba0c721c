"""The durable queue (qmail-queue's role) and its scheduler (qmail-send's)."""
