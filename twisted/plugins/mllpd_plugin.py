from twisted.application.service import ServiceMaker

mllpd = ServiceMaker(
    "mllpd", "mllpd.tap", "Durable HL7 v2 MLLP gateway", "mllp"
)
