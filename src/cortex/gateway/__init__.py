"""The HTTP gateway: OpenAI- and Anthropic-compatible APIs in front of the fleet.

Two owners, each of one lifetime:
  service.build_gateway   the process's: connects, opens the buckets, starts the watches and builds
                          the Gateway whole (dispatch.Dispatcher, placer.Placer, the control
                          client, placement.pins.Pins, the usage view); app.build_app's lifespan
                          runs it and closes it
  exchange.Exchange       each request's: its id, its log context, and the one record of how it ended
                          (made by exchange.ExchangeMiddleware)
Endpoints (routes, admin, fleet_page) parse and answer; streaming runs a request's job (warm or
cold) to the end; errors maps every failure to its dialect's envelope; auth says who may call.
"""
