"""Locust users of three priority tiers for loadtest/tiers.py: the locustfile's LLMUser (its
options, prompt mix, validation and request log), each class its own tenant, 1:2:1. With
--send-priority each sends its tier in X-Priority (the gateway's header, README "Tenants and
priority tiers"); without, all are served as standard: the same traffic with tiers off.

    locust -f loadtest/tiers_users.py --host http://127.0.0.1:8080 --headless -u 64 --stream --send-priority
"""

from locust import events

from loadtest import locustfile


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    parser.add_argument("--send-priority", action="store_true", default=False, env_var="LOCUST_SEND_PRIORITY",
                        help="each user class sends its tier in X-Priority")


class TierUser(locustfile.LLMUser):
    abstract = True
    tier = "standard"

    def on_start(self) -> None:
        super().on_start()
        self.client.headers["X-Tenant"] = f"team-{self.tier}"
        if self.environment.parsed_options.send_priority:
            self.client.headers["X-Priority"] = self.tier


class PremiumUser(TierUser):
    tier, weight = "premium", 1


class StandardUser(TierUser):
    tier, weight = "standard", 2


class BatchUser(TierUser):
    tier, weight = "batch", 1
