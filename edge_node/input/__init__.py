"""Where inputs come from: the MQTT input topic, a directory, a dataset replay,
and the bounded intake that hands them to inference a batch at a time.
"""
