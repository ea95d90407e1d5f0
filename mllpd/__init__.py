"""mllpd: a durable HL7 v2 MLLP gateway."""

__version__ = "0.1.0.dev0"
