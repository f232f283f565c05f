"""Infrastructure: configuration, logging, start-up and the metrics sink."""
