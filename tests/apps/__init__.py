"""Small applications that the subprocess tests run under ``opentelemetry-instrument``."""
