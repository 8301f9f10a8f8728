/*
 * Oakling's client-id rule as a mosquitto plugin: an identity may connect only with a client id of its
 * own, so a valid login cannot displace another client's session by borrowing its id.
 *
 * The rule is broker/identity.py's client_id_owner and broker/acl.py's client_id_allowed, said again in
 * C because mosquitto runs no Python; tests/test_clientid.py checks both against one table of cases,
 * this one through a real mosquitto. The password file still decides passwords: this plugin answers
 * "not authorised" for a foreign client id and defers everything else to it.
 *
 * It also disconnects revoked identities, which mosquitto itself never does: at every reload (SIGHUP) it
 * kicks the users named in the file of its option kick_file, one a line, with their last wills (so their
 * parents see them go).
 *
 * oak builds it at mosquitto's start (broker/mosquitto_plugin.py) with the system's C compiler and
 * mosquitto's plugin header (Debian: mosquitto-dev).
 */
#include <stdio.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

static mosquitto_plugin_id_t *plugin_id;
static char kick_file[4096];

static int starts_with(const char *text, const char *prefix)
{
	return strncmp(text, prefix, strlen(prefix)) == 0;
}

static int is_nonce(const char *id)
{
	if (strlen(id) != 32) return 0;
	for (; *id; id++) {
		if (!strchr("0123456789abcdef", *id)) return 0;
	}
	return 1;
}

/* Write into owner the username that alone may use id; return 0 when no machine owns it. */
static int owner_of(const char *id, char *owner, size_t size)
{
	if (!strcmp(id, "root") || !strcmp(id, "cluster") || !strcmp(id, "bridge")) {
		snprintf(owner, size, "svc.%s", id);
	} else if (starts_with(id, "cluster.") || starts_with(id, "node.")) {
		snprintf(owner, size, "%s", id);
	} else if (is_nonce(id)) {
		snprintf(owner, size, "join.");  /* any newcomer: join.newcomer, join.discover */
	} else {
		return 0;
	}
	return 1;
}

static int client_id_allowed(const char *username, const char *id)
{
	char owner[512];
	size_t length;

	if (!username || !id) return 0;
	if (starts_with(username, "svc.")) return 1; /* the tier's own services */
	if (owner_of(id, owner, sizeof owner)) {
		if (!strcmp(owner, "join.")) return starts_with(username, "join.");
		return strcmp(owner, username) == 0;
	}
	if (strchr(username, '.')) return 0; /* a machine: its own ids only */
	if (starts_with(id, "auto-")) return 1; /* a broker's name for a client that sent none */
	length = strlen(username);
	return strncmp(id, username, length) == 0 && (id[length] == '\0' || id[length] == '-');
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *auth = event_data;
	const char *id = mosquitto_client_id(auth->client);

	(void)event;
	(void)userdata;
	if (client_id_allowed(auth->username, id)) return MOSQ_ERR_PLUGIN_DEFER;
	mosquitto_log_printf(MOSQ_LOG_WARNING, "oak: refused %s: client id %s is not its own",
	                     auth->username ? auth->username : "(no username)", id ? id : "(none)");
	return MOSQ_ERR_AUTH;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	char line[512];
	FILE *names;

	(void)event;
	(void)event_data;
	(void)userdata;
	if (!kick_file[0] || !(names = fopen(kick_file, "r"))) return MOSQ_ERR_SUCCESS;
	while (fgets(line, sizeof line, names)) {
		line[strcspn(line, "\r\n")] = '\0';
		if (line[0]) {
			mosquitto_log_printf(MOSQ_LOG_NOTICE, "oak: disconnecting revoked %s", line);
			mosquitto_kick_client_by_username(line, true);
		}
	}
	fclose(names);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	(void)supported_version_count;
	(void)supported_versions;
	return 5;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	plugin_id = identifier;
	for (int i = 0; i < option_count; i++) {
		if (!strcmp(options[i].key, "kick_file")) snprintf(kick_file, sizeof kick_file, "%s", options[i].value);
	}
	mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
}
