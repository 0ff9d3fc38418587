"""The wire format: generated stubs (_pb/) and the proto <-> nestvec.types conversions."""
