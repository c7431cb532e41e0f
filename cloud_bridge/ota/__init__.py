"""Getting models to devices: Ed25519-signed commands, the chunk server, binary
patches between versions, and the signing keys.
"""
