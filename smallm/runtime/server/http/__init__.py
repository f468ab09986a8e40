"""The HTTP front end: an aiohttp app with the SGLang-native and OpenAI-compatible routes."""
