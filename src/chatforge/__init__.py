"""chatforge: from a conversational corpus and one YAML file to a chatbot served over gRPC."""

__version__ = "0.1.0"
