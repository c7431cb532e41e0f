"""What happens to a scored input: confident answers stay local, unsure ones are
escalated to the cloud (request/response, bounded, with a local fallback), uncertain ones sampled.
"""
