"""The HTTP front: /collect logic (plain function), client IP, routes for aiohttp."""
