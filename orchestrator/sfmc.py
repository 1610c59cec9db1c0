"""The vocabulary of the SFMC journey history API: paths, columns and accepted values.

The lists come from Salesforce's documentation page for the download call. They are
shared by the client (to validate a request) and the sandbox (to answer one).
"""

from __future__ import annotations

import datetime as dt

TOKEN_PATH = "v2/token"  # noqa: S105 - a URL path, not a secret
DOWNLOAD_PATH = "interaction/v1/interactions/journeyhistory/download"
ESTIMATE_PATH = "interaction/v1/interactions/journeyhistory/estimate"
FRESHNESS_PATH = "interaction/v1/interactions/journeyhistory/freshness"

FORMATS = ("csv", "tsv")

COLUMNS = (
    "ActivityId",
    "ActivityName",
    "ActivityType",
    "ClientStatus",
    "ContactKey",
    "CreatedDate",
    "DefinitionId",
    "DefinitionInstanceId",
    "DefinitionName",
    "EndDate",
    "EntrySource",
    "EpochTimeInMilliseconds",
    "EventId",
    "EventName",
    "Id",
    "Message",
    "OutcomeActivityId",
    "SourceType",
    "StartDate",
    "Status",
    "TransactionTime",
    "Result.Messages",
    "Result.Outcome",
    "Result.Status",
    "Result.Tags",
)

DEFAULT_COLUMNS = (
    "TransactionTime",
    "ContactKey",
    "Status",
    "DefinitionId",
    "DefinitionName",
    "ActivityId",
    "ActivityName",
    "ActivityType",
)

ACTIVITY_TYPES = (
    "abntest",
    "abnteststop",
    "activeaudiencejourneyactivity",
    "einsteinengagementfrequencysplit",
    "emailv2",
    "engagementdecision",
    "exitcriteriaactivity",
    "goalcriteriaactivity",
    "inappsyncactivity",
    "multicriteriadecision",
    "multicriteriadecisionextension",
    "pushinboxactivity",
    "pushnotificationactivity",
    "pushsync",
    "randomsplit",
    "rest",
    "restdecision",
    "salescloudactivity",
    "salesforceleadconversionactivity",
    "sendtolinesync",
    "smssync",
    "startinteractionactivity",
    "stopinteractionactivity",
    "stowait",
    "trigger",
    "updatecontactdata",
    "wait",
    "waitactivity",
    "waituntilapi",
    "waituntilchatresponse",
    "waituntilpushengagement",
    "whatsappactivity",
)

# Spelled as documented, typos included ("WaitActivtyAlreadyProcessed").
STATUSES = (
    "Active",
    "Complete",
    "ContactAlreadyInInteraction",
    "ContactExitedAsOutOfMarketAudienceSegment",
    "ContactExitedByApi",
    "ContactIsDeleted",
    "ContactIsRestricted",
    "ContactKeyNotProvided",
    "ContactNotFound",
    "ContactObjectNull",
    "ContactPreviouslyInSameInteraction",
    "ContactStatusIsUnknown",
    "CouldNotParseInteractionId",
    "CurrentlyWaitingInSameInteraction",
    "Deactivated",
    "DidNotMeetEntryCriteria",
    "ErrorDeterminingInitialActivity",
    "ErrorOccurredinProcessing",
    "ErrorProcessingWaitActivity",
    "ErrorValidatingContact",
    "ExitCriteriaMet",
    "Failed",
    "GoalCriteriaAlreadyMet",
    "GoalCriteriaMet",
    "GoalCriteriaMetInWait",
    "GoalCriteriaNotMet",
    "GoalNotDefined",
    "InteractionNotPublished",
    "InvalidInteractionId",
    "MetCriteria",
    "MovedToHigherPriorityInteraction",
    "NotEvaluatingEntryCriteria",
    "StoppedByUser",
    "UnableToDeserializeMessage",
    "Unknown",
    "WaitActivtyAlreadyProcessed",
    "Waiting",
    "WaitingForAsync",
    "WaitUntilEventCriteriaMet",
    "WaitUntilEventCriteriaNotMet",
)

# Request body keys of the filters, by the name the command line and config use.
FILTER_KEYS = {
    "statuses": "statuses",
    "activity_types": "activityTypes",
    "definition_ids": "definitionIds",
    "definition_instance_ids": "definitionInstanceIds",
    "activity_ids": "activityIds",
    "contact_keys": "contactKeys",
}

RETENTION_DAYS = 30
DOWNLOAD_CAP_BYTES = 1_000_000_000
MAX_LAG_SECONDS = RETENTION_DAYS * 86400  # a history lag beyond this is not believed
TIME_COLUMN = "TransactionTime"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def format_time(moment_ms: int) -> str:
    """Epoch milliseconds as the API writes times: 2024-02-16T09:23:06.564Z (UTC)."""
    moment = EPOCH + dt.timedelta(milliseconds=moment_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment_ms % 1000:03d}Z"
