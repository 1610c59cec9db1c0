"""The fixed cast of the synthetic history: journeys, activities, contacts, messages.

Everything here is drawn from one seeded generator, so a seed always yields the same
journeys, contact keys and message texts, whatever hour is asked for later.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from orchestrator import sfmc

JOURNEY_COUNT = 6
CONTACT_COUNT = 1500

JOURNEY_NAMES = (
    "Welcome Series",
    "Abandoned Cart",
    "Win-back, Lapsed Customers",
    'Renewal "Gold" Members',
    "Bienvenue \u2013 Nouveaux clients",
    "Post-purchase Survey",
    "Birthday Offer",
    "Onboarding: Mobile App",
    "Loyalty Tier Upgrade",
    "Event Reminder, 3 Steps",
)
ACTIVITY_LABELS = {
    "emailv2": "Send Email",
    "wait": "Wait 2 Days",
    "waitactivity": "Wait, Then Check",
    "multicriteriadecision": "Decision Split",
    "randomsplit": "Random Split",
    "smssync": "Send SMS",
    "updatecontactdata": "Update Contact",
    "rest": "Call CRM Endpoint",
    "pushnotificationactivity": "Push Notification",
    "engagementdecision": "Opened Email?",
}
SOURCE_TYPES = ("APIEvent", "DataExtension", "ContactEvent", "SalesforceObject")
FIRST_NAMES = ("anna", "jose", "mei", "olu", "pierre", "zoe", "liam", "sara", "ivan")
LAST_NAMES = ("kowalski", "garcia", "chen", "adeyemi", "martin", "smith", "novak")
DOMAINS = ("example.com", "example.org", "mail.example.net")
MESSAGE_KEYS = ("Code", "Channel", "Detail", "Attempt", "Endpoint", "Reason")
MESSAGE_DETAILS = (
    "Accepted, queued for delivery",
    "Sent",
    "Opened, device mobile",
    "Soft bounce, mailbox full",
    "Rate limited, will retry",
    "Delivered",
    "Clicked link 2, footer",
)
NOTES = (
    "Contact not found in the entry audience",
    'Endpoint answered "503 Service Unavailable"\nRetrying in 5 minutes',
    'Value "Gold, Tier 2" is not a valid option',
    "Line one of the trace\r\nLine two, after a CRLF",
    "Timed out waiting for the send to complete",
    'Decision "Opened Email?" evaluated to false',
)
TAGS = ("", "", "vip", "vip,eu", "newsletter;promo", "onboarding")
CLIENT_STATUSES = ("", "", "Sent", "Delivered", "Queued", "Bounced")


@dataclass(frozen=True, slots=True)
class Activity:
    """One activity of a journey version."""

    id: str
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class JourneyVersion:
    """One published version of a journey: the rows' DefinitionId and its parts."""

    definition_id: str
    name: str
    instance_ids: tuple[str, ...]
    activities: tuple[Activity, ...]
    source_type: str
    entry_source: str
    event_name: str


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The journeys, contacts and text pools rows are drawn from."""

    versions: tuple[JourneyVersion, ...]
    contacts: tuple[str, ...]
    result_messages: tuple[str, ...]
    notes: tuple[str, ...]


def guid(bits: int) -> str:
    """Format 128 random bits as a version-4 style GUID."""
    text = f"{bits:032x}"
    variant = "89ab"[bits & 3]
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{variant}{text[17:20]}-{text[20:]}"


def build_catalogue(seed: int) -> Catalogue:
    """Draw the fixed cast for a seed."""
    rng = random.Random(f"catalogue:{seed}")
    names = rng.sample(JOURNEY_NAMES, JOURNEY_COUNT)
    versions = tuple(
        _version(rng, name, number)
        for name in names
        for number in range(1, rng.randint(2, 4) + 1)
    )
    contacts = tuple(_contact_key(rng, index) for index in range(CONTACT_COUNT))
    messages = tuple(_result_messages(rng) for _ in range(48))
    return Catalogue(versions, contacts, messages, NOTES)


def _version(rng: random.Random, name: str, number: int) -> JourneyVersion:
    instances = tuple(guid(rng.getrandbits(128)) for _ in range(rng.randint(2, 3)))
    source = rng.choice(SOURCE_TYPES)
    event = f"{name.split(maxsplit=1)[0].strip(',')}_Entry_v{number}"
    return JourneyVersion(
        definition_id=guid(rng.getrandbits(128)),
        name=name,
        instance_ids=instances,
        activities=_activities(rng),
        source_type=source,
        entry_source=f"{source}-{guid(rng.getrandbits(128))}",
        event_name=event,
    )


def _activities(rng: random.Random) -> tuple[Activity, ...]:
    kinds = ["trigger", *rng.sample(sfmc.ACTIVITY_TYPES, rng.randint(4, 7))]
    return tuple(
        Activity(guid(rng.getrandbits(128)), _activity_name(kind, index), kind)
        for index, kind in enumerate(kinds)
    )


def _activity_name(kind: str, index: int) -> str:
    if kind == "trigger":
        return "Journey Entry"

    label = ACTIVITY_LABELS.get(kind, kind.title())
    return f"{label} {index}"


def _contact_key(rng: random.Random, index: int) -> str:
    draw = rng.random()
    if draw < 0.45:
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        return f"{first}.{last}{index}@{rng.choice(DOMAINS)}"

    if draw < 0.90:
        alphabet = string.ascii_letters + string.digits
        return "0035e" + "".join(rng.choices(alphabet, k=13))

    if draw < 0.95:
        return f"{rng.choice(LAST_NAMES).title()}, {index}"

    return f'ext"{index}"'


def _result_messages(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 4)):
        pairs = [f"Code:{rng.choice((200, 202, 400, 429, 500))}"]
        keys = rng.sample(MESSAGE_KEYS[1:], rng.randint(1, 3))
        pairs.extend(f"{key}:{rng.choice(MESSAGE_DETAILS)}" for key in keys)
        parts.append(";".join(pairs))

    return "|".join(parts)
