"""Python client of the inspection service: gRPC (sync and asyncio), command line."""
