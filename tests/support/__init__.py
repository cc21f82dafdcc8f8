"""What tests share: tiny randomly initialised models, the fake Gemini API, a TCP proxy that cuts connections."""
