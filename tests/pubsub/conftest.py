from stanchion.testing.conformance.pubsub import pubsub_amqp_url  # noqa: F401
