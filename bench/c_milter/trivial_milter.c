/*
 * The trivial milter of bench/mta_bench.py in plain C on libmilter: for measuring only.
 *
 * The same conversation as the trivial pymilter milter (integration/test_harness.py's
 * `milter` mode): every action the MTA offers kept, as pymilter answers; every step but
 * RCPT and end of message negotiated away (as pymilter's negotiate() does for the
 * callbacks that milter lacks);
 * RCPT remembers the recipient and continues; end of message deletes each remembered
 * recipient, adds the given addresses and accepts. Same libmilter, same threads, same
 * packets: what is left is libmilter's own cost, without Python.
 *
 *     gcc -O2 -o trivial_milter trivial_milter.c -lmilter -lpthread
 *     trivial_milter SOCKET ADDR...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <libmilter/mfapi.h>
#include <libmilter/mfdef.h>

static char **adds;   /* the destinations, as given ("<a@b>") */
static int nadds;

struct rcpts {        /* one connection's recipients of the current message */
	char **v;
	int n, cap;
};

static struct rcpts *
priv(SMFICTX *ctx)
{
	struct rcpts *r = smfi_getpriv(ctx);
	if (r == NULL && (r = calloc(1, sizeof *r)) != NULL)
		smfi_setpriv(ctx, r);
	return r;
}

static void
clear(struct rcpts *r)
{
	for (int i = 0; i < r->n; i++)
		free(r->v[i]);
	r->n = 0;
}

static sfsistat
negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
	  unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
	(void)ctx; (void)f2; (void)f3;
	*pf0 = f0;  /* pymilter's negotiate() keeps every action the MTA offers */
	*pf1 = f1 & (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NODATA | SMFIP_NOUNKNOWN
		     | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_SKIP);
	*pf2 = *pf3 = 0;
	return SMFIS_CONTINUE;
}

static sfsistat
envrcpt(SMFICTX *ctx, char **argv)
{
	struct rcpts *r = priv(ctx);
	if (r == NULL)
		return SMFIS_TEMPFAIL;
	if (r->n == r->cap) {
		int cap = r->cap ? 2 * r->cap : 4;
		char **v = realloc(r->v, cap * sizeof *v);
		if (v == NULL)
			return SMFIS_TEMPFAIL;
		r->v = v;
		r->cap = cap;
	}
	if ((r->v[r->n] = strdup(argv[0])) == NULL)
		return SMFIS_TEMPFAIL;
	r->n++;
	return SMFIS_CONTINUE;
}

static sfsistat
eom(SMFICTX *ctx)
{
	struct rcpts *r = priv(ctx);
	if (r == NULL)
		return SMFIS_TEMPFAIL;
	for (int i = 0; i < r->n; i++)
		if (smfi_delrcpt(ctx, r->v[i]) != MI_SUCCESS)
			return SMFIS_TEMPFAIL;
	for (int i = 0; i < nadds; i++)
		if (smfi_addrcpt(ctx, adds[i]) != MI_SUCCESS)
			return SMFIS_TEMPFAIL;
	clear(r);
	return SMFIS_ACCEPT;
}

static sfsistat
abort_(SMFICTX *ctx)  /* no packet: the message is over, forget its recipients */
{
	struct rcpts *r = smfi_getpriv(ctx);
	if (r != NULL)
		clear(r);
	return SMFIS_CONTINUE;
}

static sfsistat
close_(SMFICTX *ctx)  /* no packet: the connection is gone */
{
	struct rcpts *r = smfi_getpriv(ctx);
	if (r != NULL) {
		clear(r);
		free(r->v);
		free(r);
		smfi_setpriv(ctx, NULL);
	}
	return SMFIS_CONTINUE;
}

int
main(int argc, char **argv)
{
	struct smfiDesc desc = {
		.xxfi_name = "c-trivial",
		.xxfi_version = SMFI_VERSION,
		.xxfi_flags = SMFIF_ADDRCPT | SMFIF_DELRCPT,
		.xxfi_envrcpt = envrcpt,
		.xxfi_eom = eom,
		.xxfi_abort = abort_,
		.xxfi_close = close_,
		.xxfi_negotiate = negotiate,
	};
	char conn[4096];

	if (argc < 3) {
		fprintf(stderr, "usage: %s SOCKET ADDR...\n", argv[0]);
		return 2;
	}
	adds = argv + 2;
	nadds = argc - 2;
	snprintf(conn, sizeof conn, "unix:%s", argv[1]);
	umask(0);  /* the socket must be writable by the postfix user */
	if (smfi_setconn(conn) != MI_SUCCESS || smfi_settimeout(60) != MI_SUCCESS
	    || smfi_register(desc) != MI_SUCCESS || smfi_opensocket(true) != MI_SUCCESS) {
		fprintf(stderr, "cannot set up the milter on %s\n", conn);
		return 1;
	}
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
