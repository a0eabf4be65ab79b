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
 * With -r SENDER, routemilter's routing + SRS conversation instead, as its session.py
 * negotiates it (no Python, no routing, no real SRS: the packets only): MAIL and the
 * headers without replies, only the queue-id macro at every stage, and at end of message
 * the trace header inserted on top, the envelope sender changed to SENDER (a fixed SRS0
 * address), the destinations added and the recipients deleted, in routemilter's order.
 *
 *     gcc -O2 -o trivial_milter trivial_milter.c -lmilter -lpthread
 *     trivial_milter [-r SENDER] SOCKET ADDR...
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
static char *srs;     /* -r: the new envelope sender; NULL: the trivial conversation */

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
	(void)f2; (void)f3;
	*pf2 = *pf3 = 0;
	if (srs != NULL) {  /* routemilter's negotiate() for routing + SRS */
		*pf0 = f0 & (SMFIF_ADDHDRS | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGFROM | SMFIF_SETSYMLIST);
		*pf1 = f1 & (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NR_MAIL | SMFIP_NODATA | SMFIP_NOUNKNOWN
			     | SMFIP_NR_HDR | SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_NR_BODY | SMFIP_SKIP);
		for (int stage = SMFIM_CONNECT; stage <= SMFIM_EOH; stage++)
			if (smfi_setsymlist(ctx, stage, "i") != MI_SUCCESS)
				return SMFIS_TEMPFAIL;
		return SMFIS_CONTINUE;
	}
	*pf0 = f0;  /* pymilter's negotiate() keeps every action the MTA offers */
	*pf1 = f1 & (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NODATA | SMFIP_NOUNKNOWN
		     | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NOBODY | SMFIP_SKIP);
	return SMFIS_CONTINUE;
}

static sfsistat
envfrom(SMFICTX *ctx, char **argv)  /* -r only: a new transaction (no reply) */
{
	struct rcpts *r = priv(ctx);
	(void)argv;
	if (r != NULL)
		clear(r);
	return SMFIS_NOREPLY;
}

static sfsistat
header(SMFICTX *ctx, char *name, char *value)  /* -r only: received, nothing done (no reply) */
{
	(void)ctx; (void)name; (void)value;
	return SMFIS_NOREPLY;
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
	if (srs != NULL) {  /* routemilter's Plan applied: trace header, sender, adds, deletes */
		if (smfi_insheader(ctx, 0, "X-Routemilter", "mx.bench.test; rules=family") != MI_SUCCESS
		    || smfi_chgfrom(ctx, srs, NULL) != MI_SUCCESS)
			return SMFIS_TEMPFAIL;
		for (int i = 0; i < nadds; i++)
			if (smfi_addrcpt(ctx, adds[i]) != MI_SUCCESS)
				return SMFIS_TEMPFAIL;
	}
	for (int i = 0; i < r->n; i++)
		if (smfi_delrcpt(ctx, r->v[i]) != MI_SUCCESS)
			return SMFIS_TEMPFAIL;
	for (int i = 0; srs == NULL && i < nadds; i++)
		if (smfi_addrcpt(ctx, adds[i]) != MI_SUCCESS)
			return SMFIS_TEMPFAIL;
	clear(r);
	return srs != NULL ? SMFIS_CONTINUE : SMFIS_ACCEPT;
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

	if (argc > 2 && strcmp(argv[1], "-r") == 0) {
		srs = argv[2];
		argv += 2;
		argc -= 2;
		desc.xxfi_flags |= SMFIF_ADDHDRS | SMFIF_CHGFROM | SMFIF_SETSYMLIST;
		desc.xxfi_envfrom = envfrom;
		desc.xxfi_header = header;
	}
	if (argc < 3) {
		fprintf(stderr, "usage: %s [-r SENDER] SOCKET ADDR...\n", argv[0]);
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
