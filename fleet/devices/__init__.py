"""Who may speak to the fleet: enrolled device identities, the broker that enforces them, and the roster every
consumer of device messages checks.

    broker.py           the Mosquitto configuration (TLS, dynamic security: client id bound to the user,
                        per-device topics, subscriptions refused beyond them), pure where it can be
    broker_control.py   changing a running broker's identities (the plugin's control topic) or a stopped
                        one's file
    enrollment.py       enroll, revoke and list devices: the registry database and the broker together
    roster.py           DeviceRoster: enrolled and not revoked, cached, read sparingly
    embedded_broker.py  an in-process MQTT 3.1.1 broker (amqtt) for the demo and tests
    mqtt_client.py      BufferedClient: paho reading the broker's stream in 64 KiB chunks and acknowledging a
                        batch of messages in one write (the ingest worker's client)
"""
