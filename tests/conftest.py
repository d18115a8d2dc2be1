import logging

logging.getLogger("p2psl").setLevel(logging.DEBUG)
