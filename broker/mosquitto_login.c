/*
 * Oakling's login plugin for mosquitto: what broker/plugins.py does for the embedded broker, said in C
 * because mosquitto runs no Python. On each password listener it
 *
 * 1. binds client ids to identities: an identity may connect only with a client id of its own, so a
 *    valid login cannot displace another client's session (broker/identity.py's client_id_owner and
 *    broker/acl.py's client_id_allowed; tests/test_clientid.py checks both against one table of cases);
 * 2. checks passwords itself, against the listener's password file (option password_file, mosquitto's
 *    own $7$ format, PBKDF2-SHA512), and remembers for each user the last password that was right (as an
 *    HMAC under a key made at start), so a script or the CLI that connects again costs no hashing
 *    (broker/credentials.py's remembers);
 * 3. slows down failed logins per source address and per user name with a doubling backoff, answered
 *    without hashing and logged once per burst; a remembered password is never refused
 *    (broker/login_guard.py has the rules and their constants);
 * 4. disconnects revoked identities, which mosquitto itself never does: at every reload (SIGHUP) it kicks
 *    the users named in the file of its option kick_file, one a line, with their last wills.
 *
 * A user name the file does not hold is hashed against a dummy salt, so it costs what a wrong password
 * costs and tells no one which names exist. oak builds this at mosquitto's start
 * (broker/mosquitto_plugin.py) with the system's C compiler, mosquitto's plugin header (Debian:
 * mosquitto-dev) and OpenSSL's (libssl-dev).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

/* broker/login_guard.py */
#define FREE_FAILURES 5
#define FIRST_BACKOFF 1.0
#define MAX_BACKOFF 60.0
#define FORGET_AFTER 600.0
#define MAX_TRACKED 4096
/* broker/credentials.py ITERATIONS and broker/mosquitto_credentials.py MACHINE_ITERATIONS */
#define USER_ITERATIONS 100000
#define MACHINE_ITERATIONS 101
#define MAX_BYTES 64 /* of a salt or a hash */

struct account {
	char *username;
	int iterations;
	unsigned char salt[MAX_BYTES], hash[MAX_BYTES];
	int salt_length, hash_length;
	unsigned char remembered[SHA256_DIGEST_LENGTH]; /* HMAC of the last right password */
	int has_remembered;
};

struct instance { /* one per listener (per_listener_settings) */
	mosquitto_plugin_id_t *id;
	char kick_file[4096];
	char password_file[4096];
	struct account *accounts;
	size_t count;
};

struct record { /* failed logins of one key: a source address or a user name */
	unsigned char key[SHA256_DIGEST_LENGTH];
	int failures;
	double until, last;
	int used;
};

/* Shared by the listeners: an attacker is the same one whichever port it tries. */
static struct record records[MAX_TRACKED];
static unsigned char secret[32];
static int have_secret;
static const unsigned char dummy_salt[12] = "oak-nobody!";

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* ---- client ids ------------------------------------------------------------------------------ */

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

/* ---- the password file ----------------------------------------------------------------------- */

/* Decode base64 text of length n into out (at most MAX_BYTES); the byte count, or -1. */
static int decode(const char *text, size_t n, unsigned char *out)
{
	unsigned char buffer[3 * ((2 * MAX_BYTES + 3) / 4) + 3];
	int length, padding = 0;

	if (n == 0 || n % 4 || n > 4 * ((MAX_BYTES + 2) / 3)) return -1;
	length = EVP_DecodeBlock(buffer, (const unsigned char *)text, (int)n);
	if (length < 0) return -1;
	while (padding < 2 && text[n - 1 - padding] == '=') padding++;
	length -= padding;
	if (length <= 0 || length > MAX_BYTES) return -1;
	memcpy(out, buffer, (size_t)length);
	return length;
}

/* Parse "name:$7$iterations$salt$hash" into account; 0 when the line is not one. */
static int parse_line(char *line, struct account *account)
{
	char *colon = strchr(line, ':'), *salt, *hash, *end;
	long iterations;

	line[strcspn(line, "\r\n")] = '\0';
	if (!colon || colon == line || strncmp(colon + 1, "$7$", 3)) return 0;
	iterations = strtol(colon + 4, &end, 10);
	if (*end != '$' || iterations < 1 || iterations > 10000000) return 0;
	salt = end + 1;
	hash = strchr(salt, '$');
	if (!hash) return 0;
	account->salt_length = decode(salt, (size_t)(hash - salt), account->salt);
	account->hash_length = decode(hash + 1, strlen(hash + 1), account->hash);
	if (account->salt_length < 0 || account->hash_length < 0) return 0;
	*colon = '\0';
	account->username = strdup(line);
	account->iterations = (int)iterations;
	account->has_remembered = 0;
	return account->username != NULL;
}

static struct account *find(struct account *accounts, size_t count, const char *username)
{
	for (size_t i = 0; i < count; i++) {
		if (!strcmp(accounts[i].username, username)) return &accounts[i];
	}
	return NULL;
}

static void forget_accounts(struct account *accounts, size_t count)
{
	for (size_t i = 0; i < count; i++) free(accounts[i].username);
	free(accounts);
}

/* (Re-)read the password file; a user whose line did not change keeps its remembered password. */
static void load_accounts(struct instance *self)
{
	FILE *file = fopen(self->password_file, "r");
	struct account *accounts = NULL, *grown, *old;
	size_t count = 0, capacity = 0, size = 0;
	char *line = NULL;

	if (!file) {
		mosquitto_log_printf(MOSQ_LOG_ERR, "oak: cannot read %s: no password logs in", self->password_file);
	}
	while (file && getline(&line, &size, file) != -1) {
		if (count == capacity) {
			capacity = capacity ? 2 * capacity : 64;
			grown = realloc(accounts, capacity * sizeof *accounts);
			if (!grown) break;
			accounts = grown;
		}
		if (!parse_line(line, &accounts[count])) continue;
		old = find(self->accounts, self->count, accounts[count].username);
		if (old && old->has_remembered && old->iterations == accounts[count].iterations
				&& old->hash_length == accounts[count].hash_length
				&& !memcmp(old->hash, accounts[count].hash, (size_t)old->hash_length)
				&& old->salt_length == accounts[count].salt_length
				&& !memcmp(old->salt, accounts[count].salt, (size_t)old->salt_length)) {
			memcpy(accounts[count].remembered, old->remembered, sizeof old->remembered);
			accounts[count].has_remembered = 1;
		}
		count++;
	}
	free(line);
	if (file) fclose(file);
	forget_accounts(self->accounts, self->count);
	self->accounts = accounts;
	self->count = count;
}

static void remember_digest(const char *password, unsigned char *out)
{
	unsigned int length = SHA256_DIGEST_LENGTH;
	HMAC(EVP_sha256(), secret, sizeof secret, (const unsigned char *)password, strlen(password), out, &length);
}

/* ---- failed logins: broker/login_guard.py ---------------------------------------------------- */

static struct record *record_of(const char *kind, const char *value, int create)
{
	unsigned char key[SHA256_DIGEST_LENGTH];
	struct record *free_slot = NULL, *quietest = NULL;
	double t = now();
	EVP_MD_CTX *context = EVP_MD_CTX_new();

	if (!context) return NULL;
	EVP_DigestInit_ex(context, EVP_sha256(), NULL);
	EVP_DigestUpdate(context, kind, strlen(kind) + 1);
	EVP_DigestUpdate(context, value, strlen(value));
	EVP_DigestFinal_ex(context, key, NULL);
	EVP_MD_CTX_free(context);
	for (int i = 0; i < MAX_TRACKED; i++) {
		struct record *r = &records[i];
		if (r->used && t - r->last > FORGET_AFTER && r->until <= t) r->used = 0;
		if (r->used && !memcmp(r->key, key, sizeof key)) return r;
		if (!r->used && !free_slot) free_slot = r;
		if (r->used && (!quietest || r->last < quietest->last)) quietest = r;
	}
	if (!create) return NULL;
	if (!free_slot) free_slot = quietest;
	memset(free_slot, 0, sizeof *free_slot);
	memcpy(free_slot->key, key, sizeof key);
	free_slot->used = 1;
	return free_slot;
}

static double refused_for(const char *source, const char *username)
{
	struct record *by_source = record_of("address", source, 0), *by_name = record_of("user", username, 0);
	double t = now(), wait = 0;

	if (by_source && by_source->until - t > wait) wait = by_source->until - t;
	if (by_name && by_name->until - t > wait) wait = by_name->until - t;
	return wait;
}

static void failed(const char *source, const char *username)
{
	const char *kinds[2] = {"address", "user"}, *values[2] = {source, username};
	double t = now(), backoff;
	int logged = 0;

	for (int i = 0; i < 2; i++) {
		struct record *r = record_of(kinds[i], values[i], 1);
		int over;

		if (!r) continue;
		over = ++r->failures - FREE_FAILURES;
		r->last = t;
		if (over < 0) continue;
		backoff = over > 6 ? MAX_BACKOFF : FIRST_BACKOFF * (double)(1 << over);
		if (backoff > MAX_BACKOFF) backoff = MAX_BACKOFF;
		r->until = t + backoff;
		if (over == 0 && !logged) {
			mosquitto_log_printf(MOSQ_LOG_WARNING, "oak: %d failed logins for %s %s: refusing its logins for "
			                     "%.0f s, then longer with every failure (the last from %s)",
			                     FREE_FAILURES, kinds[i], values[i], backoff, source);
			logged = 1;
		}
	}
}

static void succeeded(const char *source, const char *username)
{
	struct record *r;
	if ((r = record_of("address", source, 0))) r->used = 0;
	if ((r = record_of("user", username, 0))) r->used = 0;
}

/* ---- the checks ------------------------------------------------------------------------------ */

static int check_password(struct instance *self, const char *username, const char *password, const char *source)
{
	struct account *account;
	unsigned char digest[SHA256_DIGEST_LENGTH], hash[MAX_BYTES];
	int right;

	if (!username || !password) return MOSQ_ERR_AUTH;
	account = find(self->accounts, self->count, username);
	if (account && account->has_remembered) {
		remember_digest(password, digest);
		if (!CRYPTO_memcmp(digest, account->remembered, sizeof digest)) return MOSQ_ERR_SUCCESS;
	}
	if (refused_for(source, username) > 0) return MOSQ_ERR_AUTH; /* logged once, when it began */
	if (!account) { /* as slow as a wrong password for a real one */
		PKCS5_PBKDF2_HMAC(password, (int)strlen(password), dummy_salt, sizeof dummy_salt,
		                  strchr(username, '.') ? MACHINE_ITERATIONS : USER_ITERATIONS, EVP_sha512(), MAX_BYTES, hash);
		failed(source, username);
		return MOSQ_ERR_AUTH;
	}
	right = PKCS5_PBKDF2_HMAC(password, (int)strlen(password), account->salt, account->salt_length,
	                          account->iterations, EVP_sha512(), account->hash_length, hash) == 1
	        && !CRYPTO_memcmp(hash, account->hash, (size_t)account->hash_length);
	if (!right) {
		failed(source, username);
		return MOSQ_ERR_AUTH;
	}
	remember_digest(password, account->remembered);
	account->has_remembered = 1;
	succeeded(source, username);
	return MOSQ_ERR_SUCCESS;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct instance *self = userdata;
	struct mosquitto_evt_basic_auth *auth = event_data;
	const char *id = mosquitto_client_id(auth->client);
	const char *source = mosquitto_client_address(auth->client);

	(void)event;
	if (!client_id_allowed(auth->username, id)) {
		mosquitto_log_printf(MOSQ_LOG_WARNING, "oak: refused %s: client id %s is not its own",
		                     auth->username ? auth->username : "(no username)", id ? id : "(none)");
		return MOSQ_ERR_AUTH;
	}
	if (!self->password_file[0]) return MOSQ_ERR_PLUGIN_DEFER; /* mosquitto's password_file decides */
	return check_password(self, auth->username, auth->password, source ? source : "");
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct instance *self = userdata;
	char line[512];
	FILE *names;

	(void)event;
	(void)event_data;
	if (self->password_file[0]) load_accounts(self);
	if (!self->kick_file[0] || !(names = fopen(self->kick_file, "r"))) return MOSQ_ERR_SUCCESS;
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
	struct instance *self = calloc(1, sizeof *self);

	if (!self) return MOSQ_ERR_NOMEM;
	if (!have_secret && RAND_bytes(secret, sizeof secret) != 1) {
		free(self);
		return MOSQ_ERR_UNKNOWN;
	}
	have_secret = 1;
	self->id = identifier;
	for (int i = 0; i < option_count; i++) {
		if (!strcmp(options[i].key, "kick_file")) snprintf(self->kick_file, sizeof self->kick_file, "%s", options[i].value);
		if (!strcmp(options[i].key, "password_file")) {
			snprintf(self->password_file, sizeof self->password_file, "%s", options[i].value);
		}
	}
	if (self->password_file[0]) load_accounts(self);
	*userdata = self;
	mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, self);
	return mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, self);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct instance *self = userdata;

	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(self->id, MOSQ_EVT_RELOAD, on_reload, NULL);
	mosquitto_callback_unregister(self->id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	forget_accounts(self->accounts, self->count);
	free(self);
	return MOSQ_ERR_SUCCESS;
}
