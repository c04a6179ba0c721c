"""The SMTP service: the session engine, its replies and its policy."""
