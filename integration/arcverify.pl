#!/usr/bin/perl
# Independent ARC (RFC 8617) and DKIM validation of one message on stdin, with
# Perl's Mail::DKIM (Debian libmail-dkim-perl): a different implementation from
# the dkimpy that routemilter seals with. DNS goes to the test's loopback server.
# Usage: arcverify.pl DNS_HOST DNS_PORT < message
# Prints "arc=<result> (<detail>)" and one "dkim=<result> d=<domain>" per signature.
use strict;
use warnings;
use Mail::DKIM::ARC::Verifier;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($host, $port) = @ARGV;
my $res = Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 1,
                                  udp_timeout => 3, tcp_timeout => 3, retry => 1);
Mail::DKIM::DNS::resolver($res);
local $/;
my $message = <STDIN>;
$message =~ s/\015?\012/\015\012/g;
my $arc = Mail::DKIM::ARC::Verifier->new();
$arc->PRINT($message);
$arc->CLOSE;
print "arc=", $arc->result, " (", ($arc->result_detail // ""), ")\n";
my $dkim = Mail::DKIM::Verifier->new();
$dkim->PRINT($message);
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    print "dkim=", $sig->result, " d=", $sig->domain, "\n";
}
